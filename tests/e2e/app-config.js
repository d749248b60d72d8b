// OHIF v3 configuration for the acceptance test (tests/test_ohif.py copies it over dist/app-config.js).
// One DICOMweb data source: vna itself, same origin, so no CORS is involved.
const origin = window.location.origin;

window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // the dialog asking to acknowledge investigational use would cover the viewport
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'vna',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'vna',
      configuration: {
        friendlyName: 'vna',
        name: 'vna',
        wadoUriRoot: `${origin}/wado`,
        qidoRoot: `${origin}/dicomweb`,
        wadoRoot: `${origin}/dicomweb`,
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
